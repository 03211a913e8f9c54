"""Build the `medicine` sample dataset (ShareGPT JSON) from the hand-written fact table below.

Run from the repository root: `python datasets_registry/scripts/build_medicine.py`. Deterministic:
no randomness, facts and question styles are used in table order. General textbook-level
information written for this project; it is not medical advice.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE.parent / "samples" / "medicine"
SYSTEM_PROMPT = ("You are a medical educator. Give general textbook information, not personal "
                 "medical advice, and suggest seeing a clinician for individual concerns.")

# -----------------------------------------------------------------------------
# (topic, kind, description, detail). kind picks the detail question:
#   condition -> typical features; drug -> how it works and common side effects;
#   anatomy -> main function; measure -> usual adult values.
FACTS = [
    # conditions
    ("hypertension", "condition", "Hypertension is persistently raised blood pressure in the arteries, commonly defined as readings at or above about 130/80 to 140/90 mmHg depending on the guideline.", "It usually causes no symptoms, which is why it is called a silent condition; over years it raises the risk of stroke, heart attack, heart failure and kidney disease."),
    ("type 1 diabetes", "condition", "Type 1 diabetes is an autoimmune condition in which the insulin-producing beta cells of the pancreas are destroyed, so the body makes little or no insulin.", "Typical features are thirst, passing a lot of urine, weight loss and tiredness, often developing over weeks; untreated it can lead to diabetic ketoacidosis."),
    ("type 2 diabetes", "condition", "Type 2 diabetes is a condition of high blood glucose caused by insulin resistance together with a relative shortage of insulin, strongly linked to excess weight and inactivity.", "It often develops slowly with few symptoms; thirst, frequent urination, tiredness and slow-healing infections can occur, and long-term complications affect eyes, kidneys, nerves and blood vessels."),
    ("asthma", "condition", "Asthma is a chronic inflammatory disease of the airways in which the airways narrow reversibly in response to triggers such as allergens, exercise, cold air or infections.", "Typical features are wheeze, breathlessness, chest tightness and cough, often worse at night or early morning, varying over time."),
    ("chronic obstructive pulmonary disease", "condition", "Chronic obstructive pulmonary disease (COPD) is a long-term lung disease with persistent airflow limitation, usually caused by smoking, that includes chronic bronchitis and emphysema.", "Typical features are progressive breathlessness on exertion, chronic cough and sputum, and flare-ups called exacerbations, often triggered by infections."),
    ("pneumonia", "condition", "Pneumonia is an infection of the lung tissue in which the air sacs (alveoli) fill with inflammatory fluid, most often caused by bacteria or viruses.", "Typical features are fever, cough with sputum, breathlessness, fast breathing and sometimes chest pain that worsens on breathing in."),
    ("influenza", "condition", "Influenza is an acute respiratory infection caused by influenza viruses, spread by droplets and occurring in seasonal epidemics.", "Typical features are sudden fever, muscle aches, headache, tiredness, dry cough and sore throat; most people recover in one to two weeks."),
    ("common cold", "condition", "The common cold is a mild viral infection of the nose and throat, most often caused by rhinoviruses.", "Typical features are a runny or blocked nose, sneezing, sore throat and mild cough, usually settling within about a week to ten days."),
    ("myocardial infarction", "condition", "A myocardial infarction, or heart attack, is death of part of the heart muscle caused by a blocked coronary artery, usually from a clot on a ruptured atherosclerotic plaque.", "Typical features are central crushing chest pain that may spread to the arm, jaw or neck, with sweating, nausea and breathlessness; it is a medical emergency."),
    ("angina", "condition", "Angina is chest pain caused by reduced blood flow to the heart muscle, usually because of narrowed coronary arteries.", "Stable angina typically comes on with exertion or stress and eases within minutes with rest or nitrate medication."),
    ("heart failure", "condition", "Heart failure is a syndrome in which the heart cannot pump enough blood to meet the body's needs, or can do so only at raised filling pressures.", "Typical features are breathlessness, tiredness, ankle swelling and breathlessness when lying flat."),
    ("atrial fibrillation", "condition", "Atrial fibrillation is an irregular and often fast heart rhythm in which the upper chambers (atria) beat chaotically instead of contracting effectively.", "It may cause palpitations, breathlessness or dizziness, or no symptoms; it raises the risk of stroke because clots can form in the atria."),
    ("stroke", "condition", "A stroke is sudden loss of brain function caused by interrupted blood supply, either from a blocked artery (ischaemic stroke) or bleeding into the brain (haemorrhagic stroke).", "Typical features are sudden facial drooping, arm or leg weakness, speech difficulty, or loss of vision; it is an emergency where rapid treatment matters."),
    ("transient ischaemic attack", "condition", "A transient ischaemic attack (TIA) is a brief episode of stroke-like symptoms caused by temporary loss of blood supply to part of the brain, without lasting damage.", "Symptoms resemble a stroke but resolve, usually within minutes to an hour; it is a warning sign of a higher risk of stroke."),
    ("deep vein thrombosis", "condition", "Deep vein thrombosis (DVT) is a blood clot in a deep vein, most often in the leg.", "Typical features are a swollen, painful, warm calf or leg on one side; a piece of the clot can travel to the lungs as a pulmonary embolism."),
    ("pulmonary embolism", "condition", "A pulmonary embolism is a blockage of an artery in the lungs, usually by a clot that has travelled from a deep vein.", "Typical features are sudden breathlessness, chest pain worse on breathing in, fast heart rate and sometimes coughing blood."),
    ("anaemia", "condition", "Anaemia is a lower than normal amount of haemoglobin in the blood, reducing its ability to carry oxygen; iron deficiency is the most common cause worldwide.", "Typical features are tiredness, weakness, pale skin, breathlessness on exertion and sometimes palpitations."),
    ("hypothyroidism", "condition", "Hypothyroidism is underactivity of the thyroid gland, so too little thyroid hormone is produced; a common cause is autoimmune Hashimoto's thyroiditis.", "Typical features are tiredness, weight gain, feeling cold, constipation, dry skin and low mood."),
    ("hyperthyroidism", "condition", "Hyperthyroidism is overactivity of the thyroid gland with excess thyroid hormone; a common cause is Graves' disease.", "Typical features are weight loss, heat intolerance, sweating, tremor, anxiety, palpitations and sometimes a goitre."),
    ("osteoporosis", "condition", "Osteoporosis is a condition of reduced bone density and weakened bone structure that increases the risk of fractures.", "It causes no symptoms until a fracture occurs, typically of the wrist, hip or spine after a minor fall."),
    ("osteoarthritis", "condition", "Osteoarthritis is a degenerative joint condition in which cartilage wears down and the underlying bone changes, most often in the knees, hips and hands.", "Typical features are joint pain that worsens with use, brief stiffness after rest, and reduced movement."),
    ("rheumatoid arthritis", "condition", "Rheumatoid arthritis is a chronic autoimmune disease that causes inflammation of the lining of joints, often symmetrically in the small joints of the hands and feet.", "Typical features are painful, swollen joints with morning stiffness lasting more than 30 minutes, and tiredness."),
    ("gout", "condition", "Gout is an inflammatory arthritis caused by deposition of uric acid crystals in a joint.", "Typical features are sudden attacks of severe pain, redness and swelling, often in the joint at the base of the big toe."),
    ("migraine", "condition", "Migraine is a primary headache disorder with recurrent attacks of moderate to severe headache, often one-sided and throbbing.", "Attacks often come with nausea and sensitivity to light and sound, and some people have an aura such as visual disturbances beforehand."),
    ("epilepsy", "condition", "Epilepsy is a neurological condition marked by a tendency to have recurrent unprovoked seizures caused by abnormal electrical activity in the brain.", "Seizures vary from brief absences or jerks to generalised convulsions with loss of consciousness."),
    ("Parkinson's disease", "condition", "Parkinson's disease is a progressive neurological disorder caused by loss of dopamine-producing neurons in the substantia nigra of the brain.", "Typical features are tremor at rest, slowness of movement, muscle rigidity and problems with balance."),
    ("Alzheimer's disease", "condition", "Alzheimer's disease is the most common cause of dementia, a progressive neurodegenerative disease with amyloid plaques and tau tangles in the brain.", "It typically starts with short-term memory loss and progresses to problems with language, orientation, reasoning and daily activities."),
    ("multiple sclerosis", "condition", "Multiple sclerosis is an autoimmune disease in which the immune system damages the myelin sheath of nerves in the brain and spinal cord.", "Features vary and may include vision problems, numbness, weakness, fatigue and balance problems, often in relapses and remissions."),
    ("depression", "condition", "Depression is a common mental health condition with persistent low mood or loss of interest lasting at least two weeks and affecting daily life.", "Other features include changes in sleep and appetite, tiredness, poor concentration, feelings of worthlessness and sometimes thoughts of self-harm."),
    ("generalised anxiety disorder", "condition", "Generalised anxiety disorder is a mental health condition with excessive, hard-to-control worry about many everyday matters for months.", "Features include restlessness, tiredness, poor concentration, irritability, muscle tension and sleep problems."),
    ("gastro-oesophageal reflux disease", "condition", "Gastro-oesophageal reflux disease (GORD, or GERD) is a condition in which stomach acid frequently flows back into the oesophagus.", "Typical features are heartburn, a burning chest pain after meals or lying down, and acid regurgitation."),
    ("peptic ulcer", "condition", "A peptic ulcer is a sore in the lining of the stomach or duodenum, most often caused by Helicobacter pylori infection or by NSAID medicines.", "Typical features are burning upper abdominal pain and indigestion; complications include bleeding and perforation."),
    ("appendicitis", "condition", "Appendicitis is inflammation of the appendix, usually caused by blockage of its opening.", "Pain typically starts around the navel and moves to the lower right abdomen, with fever, nausea and loss of appetite."),
    ("irritable bowel syndrome", "condition", "Irritable bowel syndrome is a common functional disorder of the gut with recurrent abdominal pain linked to changes in bowel habit, without visible structural disease.", "Features include cramping pain, bloating, diarrhoea, constipation or both, often relieved by opening the bowels."),
    ("coeliac disease", "condition", "Coeliac disease is an autoimmune condition in which eating gluten damages the lining of the small intestine.", "Features include diarrhoea, bloating, weight loss, tiredness and iron-deficiency anaemia, although some people have few symptoms."),
    ("Crohn's disease", "condition", "Crohn's disease is a type of inflammatory bowel disease that can affect any part of the gut from mouth to anus, with patchy inflammation through the full thickness of the bowel wall.", "Features include abdominal pain, diarrhoea, weight loss and tiredness, often in flares."),
    ("ulcerative colitis", "condition", "Ulcerative colitis is a type of inflammatory bowel disease causing continuous inflammation of the lining of the colon, starting from the rectum.", "Typical features are bloody diarrhoea, urgency and abdominal cramps, often in flares."),
    ("hepatitis B", "condition", "Hepatitis B is a liver infection caused by the hepatitis B virus, spread through blood and body fluids, which can become chronic.", "Acute infection may cause jaundice, tiredness and nausea or no symptoms; chronic infection can lead to cirrhosis and liver cancer. A vaccine prevents it."),
    ("cirrhosis", "condition", "Cirrhosis is late-stage scarring of the liver in which normal tissue is replaced by fibrous scar tissue and nodules, impairing liver function.", "Features include tiredness, jaundice, fluid in the abdomen, easy bruising and confusion in advanced disease."),
    ("chronic kidney disease", "condition", "Chronic kidney disease is a long-term reduction in kidney function or evidence of kidney damage lasting more than three months, often caused by diabetes or high blood pressure.", "It is often silent in early stages; later features include tiredness, swelling, itching and changes in urination."),
    ("urinary tract infection", "condition", "A urinary tract infection is a bacterial infection of the bladder (cystitis) or kidneys (pyelonephritis), most often caused by Escherichia coli.", "Bladder infection typically causes burning on urination, frequency and urgency; kidney infection adds fever and loin pain."),
    ("kidney stones", "condition", "Kidney stones are hard deposits of minerals, such as calcium oxalate, that form in the kidney and can move into the ureter.", "A stone passing down the ureter causes severe colicky pain from the loin to the groin, often with blood in the urine."),
    ("tuberculosis", "condition", "Tuberculosis is an infection caused by Mycobacterium tuberculosis, spread through the air, that most often affects the lungs.", "Features of active lung disease include a persistent cough, weight loss, night sweats and fever; treatment needs several antibiotics for months."),
    ("malaria", "condition", "Malaria is a parasitic infection caused by Plasmodium species and transmitted by the bite of infected Anopheles mosquitoes.", "Typical features are cycles of fever, chills and sweating, headache and muscle aches; falciparum malaria can become life-threatening quickly."),
    ("HIV infection", "condition", "HIV infection is infection with the human immunodeficiency virus, which attacks CD4 T cells and, untreated, weakens the immune system and leads to AIDS.", "Early infection may cause a flu-like illness; with effective antiretroviral therapy people can live long lives and do not transmit the virus sexually when the virus is undetectable."),
    ("sepsis", "condition", "Sepsis is a life-threatening organ dysfunction caused by a dysregulated body response to infection.", "Warning features include fever or low temperature, fast heart rate, fast breathing, confusion and low blood pressure; it needs urgent treatment."),
    ("anaphylaxis", "condition", "Anaphylaxis is a severe, life-threatening allergic reaction that develops rapidly and affects breathing or circulation.", "Features include swelling of the throat or tongue, wheeze, breathing difficulty, low blood pressure and collapse; intramuscular adrenaline is the first treatment."),
    ("eczema", "condition", "Atopic eczema is a chronic inflammatory skin condition with dry, itchy skin, common in children and linked to asthma and hay fever.", "Typical features are itchy, dry, red patches, often in skin creases such as the elbows and knees, with flare-ups."),
    ("psoriasis", "condition", "Psoriasis is a chronic immune-mediated skin disease in which skin cells turn over too quickly, forming thickened plaques.", "Typical features are well-defined red plaques with silvery scales, often on the elbows, knees and scalp; some people develop joint inflammation."),
    ("cataract", "condition", "A cataract is clouding of the lens of the eye, most commonly due to ageing.", "Features include gradually blurred or dim vision, glare from lights and faded colours; surgery replaces the lens with an artificial one."),
    ("glaucoma", "condition", "Glaucoma is a group of eye diseases in which the optic nerve is damaged, often associated with raised pressure inside the eye.", "The common chronic form causes gradual loss of peripheral vision without early symptoms, so regular eye checks matter."),
    ("iron deficiency", "condition", "Iron deficiency is a shortage of iron in the body, caused by blood loss, poor intake, increased need such as in pregnancy, or poor absorption.", "It can cause tiredness and, once stores are exhausted, iron-deficiency anaemia with small, pale red blood cells."),
    ("dehydration", "condition", "Dehydration is a deficit of body water, when fluid losses from sweating, vomiting, diarrhoea or urine exceed intake.", "Features include thirst, dark urine, dry mouth, dizziness and, in severe cases, confusion and low blood pressure."),
    ("concussion", "condition", "Concussion is a mild traumatic brain injury caused by a blow or jolt to the head that temporarily disturbs brain function.", "Features include headache, confusion, dizziness, nausea and memory problems around the event; worsening symptoms need urgent assessment."),
    ("obesity", "condition", "Obesity is excess body fat that harms health, commonly defined in adults as a body mass index of 30 kg/m2 or more.", "It raises the risk of type 2 diabetes, heart disease, some cancers, osteoarthritis and sleep apnoea."),
    ("obstructive sleep apnoea", "condition", "Obstructive sleep apnoea is a condition in which the upper airway repeatedly collapses during sleep, briefly stopping or reducing breathing.", "Typical features are loud snoring, witnessed pauses in breathing and daytime sleepiness."),
    # drugs and treatments
    ("paracetamol", "drug", "Paracetamol, also called acetaminophen, is a widely used medicine for pain and fever.", "Its exact mechanism is not fully understood but is thought to act mainly in the central nervous system; it is well tolerated at normal doses, but overdose can cause serious liver damage."),
    ("ibuprofen", "drug", "Ibuprofen is a non-steroidal anti-inflammatory drug (NSAID) used for pain, fever and inflammation.", "It blocks cyclo-oxygenase enzymes and so reduces prostaglandin production; side effects include stomach irritation and ulcers, and it can affect the kidneys."),
    ("aspirin", "drug", "Aspirin is an NSAID that in low doses is used to prevent blood clots in people with cardiovascular disease.", "It irreversibly blocks cyclo-oxygenase in platelets, reducing thromboxane and platelet clumping; the main risk is bleeding, especially from the stomach."),
    ("amoxicillin", "drug", "Amoxicillin is a penicillin-type antibiotic used for many bacterial infections, such as chest, ear and urinary infections.", "It kills bacteria by interfering with cell wall synthesis; common side effects are diarrhoea, nausea and rash, and people with penicillin allergy must avoid it."),
    ("metformin", "drug", "Metformin is a first-line oral medicine for type 2 diabetes.", "It lowers blood glucose mainly by reducing glucose production by the liver and improving insulin sensitivity; common side effects are nausea, diarrhoea and abdominal discomfort."),
    ("insulin", "drug", "Insulin is a hormone made by the pancreas that lowers blood glucose; as a medicine it is essential in type 1 diabetes and used in some type 2 diabetes.", "It helps cells take up glucose and promotes its storage; the main risk of treatment is hypoglycaemia, low blood glucose."),
    ("statins", "drug", "Statins, such as atorvastatin and simvastatin, are medicines that lower LDL cholesterol and reduce the risk of heart attacks and strokes.", "They inhibit HMG-CoA reductase, an enzyme of cholesterol synthesis in the liver; muscle aches are a common side effect, and serious muscle damage is rare."),
    ("ACE inhibitors", "drug", "ACE inhibitors, such as ramipril and lisinopril, are medicines for high blood pressure, heart failure and kidney protection in diabetes.", "They block angiotensin-converting enzyme, reducing angiotensin II and relaxing blood vessels; a dry cough is a common side effect, and they can raise potassium."),
    ("beta blockers", "drug", "Beta blockers, such as bisoprolol and atenolol, are medicines used for angina, heart failure, some arrhythmias and high blood pressure.", "They block beta-adrenergic receptors, slowing the heart and reducing its workload; side effects include tiredness, cold hands and, in asthma, bronchospasm."),
    ("diuretics", "drug", "Diuretics are medicines that increase urine output, used for fluid overload in heart failure and for high blood pressure.", "They act on the kidney to increase excretion of sodium and water; side effects include low potassium or sodium and dehydration."),
    ("warfarin", "drug", "Warfarin is an oral anticoagulant used to prevent and treat blood clots, for example in atrial fibrillation.", "It blocks the recycling of vitamin K, reducing clotting factors; bleeding is the main risk, and dosing is monitored with the INR blood test."),
    ("salbutamol", "drug", "Salbutamol, also called albuterol, is a short-acting bronchodilator inhaler used to relieve asthma and COPD symptoms.", "It stimulates beta-2 receptors in airway smooth muscle, relaxing it within minutes; side effects include tremor and a fast heartbeat."),
    ("inhaled corticosteroids", "drug", "Inhaled corticosteroids, such as beclometasone and budesonide, are preventer medicines for asthma.", "They reduce airway inflammation when taken regularly; local side effects include oral thrush and a hoarse voice, reduced by rinsing the mouth."),
    ("proton pump inhibitors", "drug", "Proton pump inhibitors, such as omeprazole, are medicines that reduce stomach acid, used for reflux and peptic ulcers.", "They block the proton pump in the stomach's parietal cells; side effects include headache and diarrhoea, and long-term use has some risks."),
    ("antihistamines", "drug", "Antihistamines are medicines that block histamine H1 receptors, used for hay fever, itching and other allergic symptoms.", "Older ones such as chlorphenamine cause drowsiness; newer ones such as cetirizine and loratadine are less sedating."),
    ("selective serotonin reuptake inhibitors", "drug", "Selective serotonin reuptake inhibitors (SSRIs), such as sertraline and fluoxetine, are medicines used mainly for depression and anxiety disorders.", "They block reuptake of serotonin into nerve endings; side effects include nausea, sleep changes and sexual dysfunction, and benefits take a few weeks."),
    ("levothyroxine", "drug", "Levothyroxine is a synthetic form of the thyroid hormone thyroxine (T4) used to treat hypothyroidism.", "It replaces the missing hormone; the dose is adjusted using blood tests of TSH, and too much causes symptoms of hyperthyroidism."),
    ("adrenaline", "drug", "Adrenaline, also called epinephrine, is a hormone and medicine used in emergencies such as anaphylaxis and cardiac arrest.", "It stimulates alpha and beta adrenergic receptors, constricting blood vessels, strengthening the heartbeat and opening the airways."),
    ("vaccines", "drug", "Vaccines are preparations that train the immune system to recognise a pathogen without causing the disease, preventing infection or severe illness.", "They contain weakened or inactivated organisms, parts of them, or instructions to make a part; common side effects are a sore arm and mild fever."),
    ("opioids", "drug", "Opioids, such as morphine and codeine, are strong pain-relieving medicines that act on opioid receptors in the nervous system.", "Side effects include constipation, nausea and drowsiness; in overdose they depress breathing, and long-term use carries a risk of dependence."),
    ("oral rehydration solution", "drug", "Oral rehydration solution is a drink of water with precise amounts of glucose and salts used to treat dehydration from diarrhoea.", "The glucose helps the gut absorb sodium and water together; it is very safe, though vomiting can occur if it is drunk too fast, so small frequent sips are used."),
    # anatomy and physiology
    ("heart", "anatomy", "The heart is a muscular organ with four chambers, two atria and two ventricles, located in the chest between the lungs.", "It pumps blood: the right side sends blood to the lungs to collect oxygen, and the left side pumps oxygenated blood around the body."),
    ("lungs", "anatomy", "The lungs are a pair of spongy organs in the chest containing branching airways that end in millions of tiny air sacs called alveoli.", "They exchange gases: oxygen passes from the alveoli into the blood, and carbon dioxide passes out to be breathed out."),
    ("liver", "anatomy", "The liver is a large organ in the upper right abdomen.", "It processes nutrients, stores glycogen, makes proteins such as albumin and clotting factors, produces bile and breaks down drugs and toxins."),
    ("kidneys", "anatomy", "The kidneys are two bean-shaped organs at the back of the abdomen, each containing about a million filtering units called nephrons.", "They filter the blood to remove waste as urine, balance water and salts, help control blood pressure and make hormones such as erythropoietin."),
    ("pancreas", "anatomy", "The pancreas is a gland behind the stomach with both digestive and hormonal roles.", "It releases digestive enzymes into the small intestine and produces hormones such as insulin and glucagon that control blood glucose."),
    ("thyroid gland", "anatomy", "The thyroid gland is a butterfly-shaped gland at the front of the neck.", "It produces thyroid hormones, T4 and T3, which regulate metabolism, heart rate and body temperature."),
    ("spleen", "anatomy", "The spleen is an organ in the upper left abdomen, part of the lymphatic system.", "It filters the blood, removes old red blood cells and helps fight certain infections, especially encapsulated bacteria."),
    ("small intestine", "anatomy", "The small intestine is the long part of the gut between the stomach and the large intestine, made up of the duodenum, jejunum and ileum.", "It is where most digestion and absorption of nutrients take place, helped by villi that greatly increase its surface area."),
    ("large intestine", "anatomy", "The large intestine, or colon, is the final part of the gut, running from the caecum to the rectum.", "It absorbs water and salts from the remaining food matter and forms and stores faeces; it also hosts many gut bacteria."),
    ("red blood cells", "anatomy", "Red blood cells, or erythrocytes, are disc-shaped blood cells without a nucleus, made in the bone marrow and living about 120 days.", "They carry oxygen from the lungs to the tissues using haemoglobin, and help carry carbon dioxide back."),
    ("white blood cells", "anatomy", "White blood cells, or leukocytes, are immune cells in the blood, including neutrophils, lymphocytes, monocytes, eosinophils and basophils.", "They defend the body against infections and foreign material; neutrophils fight bacteria, and lymphocytes make antibodies and kill infected cells."),
    ("platelets", "anatomy", "Platelets are small cell fragments in the blood produced from megakaryocytes in the bone marrow.", "They help blood clot by sticking to damaged vessel walls and to each other to form a plug."),
    ("neurons", "anatomy", "Neurons are nerve cells with a cell body, dendrites that receive signals and an axon that carries signals onward.", "They transmit information as electrical impulses and communicate with other cells through chemical messengers at synapses."),
    ("skin", "anatomy", "The skin is the body's largest organ, made of the epidermis, dermis and underlying subcutaneous tissue.", "It protects against infection and injury, controls temperature through sweating and blood flow, senses touch and makes vitamin D in sunlight."),
    ("bone marrow", "anatomy", "Bone marrow is the soft tissue inside bones; red marrow is found mainly in flat bones and the ends of long bones in adults.", "Red marrow produces red blood cells, white blood cells and platelets from blood stem cells."),
    ("immune system", "anatomy", "The immune system is the body's defence network of cells, tissues and organs, with innate (fast, general) and adaptive (specific, with memory) branches.", "It recognises and destroys pathogens and abnormal cells; adaptive immunity creates memory, which is the basis of vaccination."),
    ("alveoli", "anatomy", "Alveoli are tiny air sacs at the ends of the airways in the lungs, surrounded by capillaries.", "Their thin walls and huge combined surface area allow oxygen to diffuse into the blood and carbon dioxide to diffuse out."),
    ("coronary arteries", "anatomy", "The coronary arteries are the blood vessels that branch from the aorta and run over the surface of the heart.", "They supply the heart muscle itself with oxygen-rich blood; narrowing of them causes angina and heart attacks."),
    ("islets of Langerhans", "anatomy", "The islets of Langerhans are small clusters of hormone-producing cells scattered through the pancreas.", "Their beta cells secrete insulin when blood glucose rises, and their alpha cells secrete glucagon when it falls."),
    # measurements and tests
    ("blood pressure", "measure", "Blood pressure is the pressure of blood against artery walls, written as systolic over diastolic pressure in millimetres of mercury.", "A typical healthy adult reading is below about 120/80 mmHg; readings repeatedly at or above about 140/90 mmHg in a clinic suggest hypertension."),
    ("resting heart rate", "measure", "The resting heart rate is the number of heartbeats per minute while at rest.", "For most adults it is between about 60 and 100 beats per minute; trained athletes often have lower rates."),
    ("respiratory rate", "measure", "The respiratory rate is the number of breaths taken per minute.", "A normal adult resting rate is about 12 to 20 breaths per minute; a raised rate can be an early sign of serious illness."),
    ("body temperature", "measure", "Body temperature is the core temperature of the body, kept stable by the hypothalamus.", "A normal value is around 37 degrees Celsius, varying slightly during the day; about 38 degrees or above is generally considered a fever."),
    ("oxygen saturation", "measure", "Oxygen saturation, measured by pulse oximetry as SpO2, is the percentage of haemoglobin in the blood that carries oxygen.", "In healthy adults it is usually 95 to 100 percent; some people with chronic lung disease have lower target ranges."),
    ("body mass index", "measure", "Body mass index (BMI) is weight in kilograms divided by the square of height in metres, a rough screening measure of body weight.", "For adults, 18.5 to 24.9 is usually classed as a healthy range, 25 to 29.9 overweight and 30 or more obese; it does not distinguish fat from muscle."),
    ("HbA1c", "measure", "HbA1c, or glycated haemoglobin, is a blood test reflecting average blood glucose over the previous two to three months.", "A value of 48 mmol/mol (6.5 percent) or more is commonly used to diagnose diabetes; values between about 42 and 47 mmol/mol suggest a higher risk."),
    ("fasting blood glucose", "measure", "Fasting blood glucose is the level of glucose in the blood after at least eight hours without food.", "A normal fasting value is roughly 3.9 to 5.5 mmol/L (70 to 100 mg/dL); 7.0 mmol/L (126 mg/dL) or more on repeated tests suggests diabetes."),
    ("electrocardiogram", "measure", "An electrocardiogram (ECG) is a test that records the electrical activity of the heart using electrodes on the skin.", "It shows heart rate and rhythm and can reveal arrhythmias, signs of a heart attack and other heart problems."),
    ("complete blood count", "measure", "A complete blood count, or full blood count, is a blood test measuring red cells, white cells, platelets and haemoglobin.", "It helps detect anaemia, infection, inflammation and blood disorders; reference ranges differ between laboratories."),
    ("LDL cholesterol", "measure", "LDL cholesterol, low-density lipoprotein cholesterol, is the main carrier of cholesterol in the blood and contributes to atherosclerosis.", "Lower values mean lower cardiovascular risk; targets depend on a person's overall risk, and statins are the main medicine to lower it."),
    ("creatinine", "measure", "Creatinine is a waste product of muscle metabolism that the kidneys filter from the blood.", "A raised blood creatinine suggests reduced kidney function; it is used to estimate the glomerular filtration rate (eGFR)."),
    ("estimated glomerular filtration rate", "measure", "The estimated glomerular filtration rate (eGFR) is a calculated estimate of how much blood the kidneys filter per minute, based on blood creatinine, age and sex.", "A value of 90 mL/min/1.73 m2 or more is normal; a value below 60 for more than three months indicates chronic kidney disease."),
    ("thyroid-stimulating hormone", "measure", "Thyroid-stimulating hormone (TSH) is a hormone from the pituitary gland that tells the thyroid to make thyroid hormones; its blood level is the main thyroid screening test.", "A high TSH usually indicates an underactive thyroid, and a low TSH usually indicates an overactive one."),
]

# Grammar for the question templates: plural topics and topics that need an article.
PLURAL = {
    "kidney stones", "ACE inhibitors", "beta blockers", "diuretics", "inhaled corticosteroids",
    "proton pump inhibitors", "antihistamines", "selective serotonin reuptake inhibitors",
    "statins", "vaccines", "opioids", "lungs", "kidneys", "red blood cells", "white blood cells",
    "platelets", "neurons", "alveoli", "coronary arteries", "islets of Langerhans",
}
ARTICLE = {
    "myocardial infarction": "a", "stroke": "a", "transient ischaemic attack": "a",
    "pulmonary embolism": "a", "peptic ulcer": "a", "urinary tract infection": "a",
    "cataract": "a", "common cold": "the", "electrocardiogram": "an", "complete blood count": "a",
    "resting heart rate": "the", "respiratory rate": "the", "estimated glomerular filtration rate": "the",
    "heart": "the", "liver": "the", "pancreas": "the", "thyroid gland": "the", "spleen": "the",
    "small intestine": "the", "large intestine": "the", "skin": "the", "immune system": "the",
    "lungs": "the", "kidneys": "the", "islets of Langerhans": "the", "coronary arteries": "the",
}
# (singular template, plural template) per kind
DETAIL_QUESTIONS = {
    "condition": ("What are the typical features of {t}?", "What are the typical features of {t}?"),
    "drug": ("How does {t} work, and what are its common side effects?",
             "How do {t} work, and what are their common side effects?"),
    "anatomy": ("What is the main function of {t}?", "What do {t} do?"),
    "measure": ("What values of {t} are usual in adults?", "What values of {t} are usual in adults?"),
}
EVAL_QUESTIONS = {
    "condition": ("Could you explain {t} to me in simple terms?", "Could you explain {t} to me in simple terms?"),
    "drug": ("I was reading about {t}. What is it used for and how does it act?",
             "I was reading about {t}. What are they used for and how do they act?"),
    "anatomy": ("Tell me briefly about {t} and what it does.", "Tell me briefly about {t} and what they do."),
    "measure": ("What is {t}, and what counts as a normal result?", "What is {t}, and what counts as a normal result?"),
}


def phrase(topic: str) -> str:
    article = ARTICLE.get(topic)
    return f"{article} {topic}" if article else topic


DISCLAIMER = "This is general information, not medical advice."


def turn(who: str, text: str) -> dict:
    return {"from": who, "value": text}


def build() -> tuple[list[dict], list[dict]]:
    train, eval_ = [], []
    for i, (topic, kind, description, detail) in enumerate(FACTS):
        plural = int(topic in PLURAL)
        t = phrase(topic)
        what_q = f"What {'are' if plural else 'is'} {t}?"
        detail_q = DETAIL_QUESTIONS[kind][plural].format(t=t)
        train.append({"conversations": [turn("human", what_q), turn("gpt", description)]})
        train.append({"conversations": [turn("human", detail_q), turn("gpt", detail)]})
        # a two-turn conversation, with the educator system prompt on every other topic
        conv = [turn("system", SYSTEM_PROMPT)] if i % 2 == 0 else []
        conv += [turn("human", f"Tell me about {t}."), turn("gpt", description),
                 turn("human", "Anything else I should know?"), turn("gpt", f"{detail} {DISCLAIMER}")]
        train.append({"conversations": conv})
        eval_q = EVAL_QUESTIONS[kind][plural].format(t=t)
        eval_conv = [turn("system", SYSTEM_PROMPT)] if i % 3 == 0 else []
        eval_conv += [turn("human", eval_q), turn("gpt", f"{description} {detail}")]
        eval_.append({"conversations": eval_conv})
    return train, eval_


def write_json(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(rows, f, ensure_ascii=False, indent=1)
        f.write("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train, eval_ = build()
    write_json(args.out / "train.json", train)
    write_json(args.out / "eval.json", eval_)
    print(f"{len(FACTS)} topics -> {len(train)} train, {len(eval_)} eval rows")


if __name__ == "__main__":
    main()
